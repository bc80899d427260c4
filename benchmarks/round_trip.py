"""The broker's own round trip, and the latency bound of the 50%-load row that uses it.

``broker_round_trip``: small records produced at a fixed rate and read back by the collector, through
the same broker, with no worker in between, both in child processes as in the rate-limited worker runs
(``loadgen``: the same producer, the same collector, the same fetch settings). Its latency is
the produce call -> record received, the same two ends as a rate run's "send -> result received": what
Kafka alone adds to a message that goes in and comes back out.

``latency_bound``: issue 11's criterion for the rate run at 50% of the peak,

    p99 latency <= max_wait_ms + 3 x batch time + the broker's round trip (p99)

with the batch time that run's own mean GPU time per batch (``gpu_batch_ms``: the GPU thread's
``worker_inference_seconds`` per batch: assembly, copies, inference, synchronize) and the round trip
measured in the same bench run at about the same rate. Percentile against percentile: the p99 of
the round trip, not its median.
"""

from __future__ import annotations

import asyncio
import json
import tempfile
import uuid
from pathlib import Path

from benchmarks import loadgen
from benchmarks.end_to_end import percentiles
from worker.broker import create_topics

BOUND_FRACTION = 0.5  # the rate run the bound is about: 50% of the measured peak
BATCH_TIMES = 3


async def broker_round_trip(bootstrap: str, partitions: int, rate: float, count: int, payload_bytes: int = 64,
                            timeout_s: float = 120.0) -> dict:
    """``count`` records of ``payload_bytes`` at ``rate`` per second -> one consumer; latency percentiles."""
    topic = f"bench-rtt-{uuid.uuid4().hex[:6]}"
    await create_topics(bootstrap, [(topic, partitions)])
    work = Path(tempfile.mkdtemp(prefix="bench-rtt-"))
    # valid JSON (the collector parses what is not a dead letter), padded to the size asked for
    payload = json.dumps({"pad": "x" * max(0, payload_bytes - 11)}).encode()
    ready = loadgen.new_event()
    collector = loadgen.start(loadgen.collector_main, bootstrap, topic, "", count, str(work / "collected.json"),
                              ready, timeout_s)
    producer = None
    try:
        while not ready.is_set():
            if not collector.is_alive():
                raise RuntimeError(f"round-trip collector exited with {collector.exitcode} before it was ready")
            await asyncio.sleep(0.02)
        go = loadgen.new_event()
        producer = loadgen.start(loadgen.producer_main, bootstrap, topic, [payload], count, rate, partitions,
                                 str(work / "sent.json"), go)
        go.set()
        await asyncio.gather(loadgen.join(collector, timeout_s), loadgen.join(producer, timeout_s))
    finally:
        for proc in (collector, producer):
            if proc is not None and proc.is_alive():
                proc.terminate()
    rows = json.loads((work / "collected.json").read_text())["rows"]
    sent = json.loads((work / "sent.json").read_text())["sent_t"]
    latencies = [(r["recv_t"] - sent[r["key"]]) * 1000 for r in rows if 0 <= r["key"] < len(sent)]
    span = max(sent) - min(sent) if sent else 0.0
    return {"topic": topic, "count": count, "received": len(rows), "payload_bytes": len(payload),
            "target_rate": rate, "achieved_send_rate": (len(sent) - 1) / span if span > 0 else 0.0,
            "partitions": partitions, "latency_ms": percentiles(latencies),
            "latency_kind": "produce call -> record received by a consumer (no worker)"}


def latency_bound(rate_run: dict | None, round_trip: dict | None) -> dict | None:
    """The criterion for one rate run (None when a number it needs is missing)."""
    if not rate_run or not round_trip:
        return None
    p99 = (rate_run.get("latency_ms") or {}).get("p99")
    batch_ms = rate_run.get("gpu_batch_ms")
    rtt = (round_trip.get("latency_ms") or {}).get("p99")
    max_wait = (rate_run.get("settings") or {}).get("max_wait_ms")
    if p99 is None or batch_ms is None or rtt is None or max_wait is None:
        return None
    bound = max_wait + BATCH_TIMES * batch_ms + rtt
    return {"fraction_of_peak": rate_run.get("fraction_of_peak"), "p99_ms": p99, "bound_ms": bound,
            "met": p99 <= bound, "max_wait_ms": max_wait, "batch_ms": batch_ms,
            "broker_round_trip_p99_ms": rtt,
            "formula": f"p99 <= max_wait_ms + {BATCH_TIMES} x batch_ms (that run's mean GPU time per batch) "
                       f"+ the broker's round trip p99 (same bench run, no worker)"}


def bound_run(rates: list[dict]) -> dict | None:
    """The rate run the criterion is about: the one at 50% of the peak."""
    return next((r for r in rates if r.get("fraction_of_peak") == BOUND_FRACTION), None)
