"""The real worker (``worker.service.serve``), Kafka -> decode -> GPU thread -> Kafka, measured from outside.

Two modes, each on fresh topics and a fresh consumer group:

- ``preloaded``: the input topic holds ``count`` images before the worker starts; throughput is
  results / (last result received - first message consumed), so model loading and the group join are
  left out. Latencies are the worker's own (``timings_ms.end_to_end`` of each result: consumed ->
  published), which under a backlog mostly measure the wait among ``max_in_flight`` messages.
- ``rate``: the worker is started and has joined; a producer in a child process sends at a fixed rate;
  latency is send -> result received by the collector (both ``time.monotonic``), so it includes Kafka.

GPU thread busy fraction = the worker's ``worker_inference_seconds`` sum (per batch: assembly into the
pinned buffer, copies, inference, synchronize) over the measured wall time.
"""

from __future__ import annotations

import asyncio
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from worker.bench import cpu_time, loadgen
from worker.bench.corpus import Topics, preload
from worker.bench.gc_pauses import GcPauses
from worker.metrics import Metrics
from worker.service import serve
from worker.settings import Settings


def percentiles(values_ms: list[float] | np.ndarray) -> dict:
    arr = np.asarray(values_ms, dtype=float)
    if arr.size == 0:
        return {"p50": None, "p95": None, "p99": None, "max": None, "mean": None}
    return {"p50": float(np.percentile(arr, 50)), "p95": float(np.percentile(arr, 95)),
            "p99": float(np.percentile(arr, 99)), "max": float(arr.max()), "mean": float(arr.mean())}


def _stages(rows: list[dict]) -> dict:
    out = {}
    for stage in ("decode", "queue", "inference", "end_to_end"):
        values = [r["timings_ms"][stage] for r in rows if not r["dlq"] and stage in r.get("timings_ms", {})]
        out[stage] = percentiles(values)
    return out


async def _wait_until(predicate, task: asyncio.Task, timeout_s: float, what: str, poll_s: float = 0.005) -> float:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if task.done():
            code = task.result()
            raise RuntimeError(f"the worker stopped (exit code {code}) while the bench waited for {what}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        await asyncio.sleep(poll_s)
    return time.monotonic()


def _poll_totals(metrics: Metrics) -> tuple[float, float, float]:
    get = metrics.registry.get_sample_value
    return (get("worker_poll_records_count") or 0.0, get("worker_poll_records_sum") or 0.0,
            get("worker_poll_wait_seconds_total") or 0.0)


async def _sample_in_flight(worker: Any, every_s: float = 0.01) -> list[int]:
    """Messages in flight every ``every_s`` until cancelled (Little's law needs the mean)."""
    samples: list[int] = []
    try:
        while True:
            samples.append(worker.tracker.in_flight())
            await asyncio.sleep(every_s)
    except asyncio.CancelledError:
        return samples


def _in_flight_summary(samples: Any) -> dict:
    if not isinstance(samples, list) or not samples:
        return {}
    arr = np.array(samples)
    return {"in_flight_mean": float(arr.mean()), "in_flight_p95": float(np.percentile(arr, 95)),
            "in_flight_samples": len(samples)}


async def worker_run(settings: Settings, bootstrap: str, images: list[bytes], distinct: list[bytes],
                     partitions: int, label: str, rate: float | None = None, rate_count: int = 0,
                     timeout_s: float = 600.0, broker_pid: int | None = None) -> dict:
    """One worker from start to stop on fresh topics: preloaded ``images`` if ``rate`` is None, else
    ``rate_count`` messages sent at ``rate`` per second while it runs."""
    topics = Topics.fresh(label)
    await topics.create(bootstrap, partitions)
    expected = len(images) if rate is None else rate_count
    preload_s = await preload(bootstrap, topics.input, images, partitions) if rate is None else 0.0
    s = settings.replace(bootstrap_servers=bootstrap, input_topic=topics.input, output_topic=topics.output,
                         dlq_topic=topics.dlq, group_id=topics.group)
    work = Path(tempfile.mkdtemp(prefix="bench-"))
    ready = loadgen.new_event()
    collector = loadgen.start(loadgen.collector_main, bootstrap, topics.output, topics.dlq, expected,
                              str(work / "collected.json"), ready, timeout_s)
    while not ready.is_set():
        if not collector.is_alive():
            raise RuntimeError(f"bench collector exited with {collector.exitcode} before it was ready")
        await asyncio.sleep(0.02)

    metrics = Metrics()
    workers: list = []
    t_start = time.monotonic()
    task = asyncio.create_task(serve(s, metrics=metrics, worker_out=workers))
    producer = None
    try:
        t_ready = await _wait_until(lambda: bool(workers), task, timeout_s, "models to load")
        if rate is None:
            t_first = await _wait_until(lambda: workers[0].counts["consumed"] > 0, task, 120, "the first message")
            cpu0, broker0 = cpu_time.thread_cpu(), cpu_time.process_cpu(broker_pid) if broker_pid else 0.0
        else:
            await _wait_until(lambda: workers[0].health.joined, task, 120, "the consumer group join", 0.02)
            go = loadgen.new_event()
            producer = loadgen.start(loadgen.producer_main, bootstrap, topics.input, distinct, rate_count, rate,
                                     partitions, str(work / "sent.json"), go)
            go.set()
            t_first = time.monotonic()
            cpu0, broker0 = cpu_time.thread_cpu(), cpu_time.process_cpu(broker_pid) if broker_pid else 0.0
        poll0 = _poll_totals(metrics)
        in_flight = asyncio.create_task(_sample_in_flight(workers[0]))
        gc_pauses = GcPauses().__enter__()
        waiters = [asyncio.create_task(loadgen.join(collector, timeout_s))]
        if producer is not None:
            waiters.append(asyncio.create_task(loadgen.join(producer, timeout_s)))
        children = asyncio.gather(*waiters)
        done, _ = await asyncio.wait({task, children}, return_when=asyncio.FIRST_COMPLETED)
        if children not in done:
            children.cancel()
            raise RuntimeError(f"the worker stopped early with exit code {task.result()}")
        children.result()  # a child's failure or time-out
        cpu = cpu_time.delta(cpu0, cpu_time.thread_cpu())
        gc_pauses.__exit__()
        in_flight.cancel()
        in_flight_samples = await asyncio.gather(in_flight, return_exceptions=True)
        poll = [b - a for a, b in zip(poll0, _poll_totals(metrics))]
        if broker_pid:
            cpu["broker_process"] = round(cpu_time.process_cpu(broker_pid) - broker0, 3)
        worker = workers[0]
        inference_s = metrics.registry.get_sample_value("worker_inference_seconds_sum") or 0.0
        batches = metrics.registry.get_sample_value("worker_batch_size_count") or 0.0
        batch_images = metrics.registry.get_sample_value("worker_batch_size_sum") or 0.0
        worker.request_stop()
        code = await task
    finally:
        if not task.done():
            if workers:
                workers[0].request_stop()
            else:
                task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        for proc in (collector, producer):
            if proc is not None and proc.is_alive():
                proc.terminate()

    collected = json.loads((work / "collected.json").read_text())
    rows = collected["rows"]
    results = [r for r in rows if not r["dlq"]]
    recv = np.array([r["recv_t"] for r in rows]) if rows else np.array([t_first])
    t_last = float(recv.max())
    wall = max(t_last - t_first, 1e-9)
    out = {
        "mode": "preloaded" if rate is None else "rate",
        "input_topic": topics.input,
        "settings": {"max_batch_size": s.max_batch_size, "max_wait_ms": s.max_wait_ms, "decoder": s.decoder,
                     "decode_threads": s.decode_threads, "max_in_flight": s.max_in_flight,
                     "partitions": partitions},
        "count": expected,
        "results": len(results),
        "dead_lettered": len(rows) - len(results),
        "duplicates": collected["duplicates"],
        "missing": expected - len(rows),
        "worker_counts": dict(worker.counts),
        "exit_code": code,
        "startup_s": t_ready - t_start,
        "preload_s": preload_s,
        "wall_s": wall,
        "images_per_s": len(rows) / wall,
        "latency_ms": percentiles([r["timings_ms"]["end_to_end"] for r in results]),
        "latency_kind": "worker: consumed -> result published (timings_ms.end_to_end)",
        "stages_ms": _stages(rows),
        "batches": int(batches),
        "mean_batch_size": batch_images / batches if batches else 0.0,
        "gpu_thread_busy_fraction": inference_s / wall,
        "cpu_s": cpu,
        "gc_pauses": gc_pauses.summary(),
        # intake: records per poll, share of the wall time the consume loop waited in poll, work in flight
        "intake": {"polls": int(poll[0]), "records_per_poll": poll[1] / max(1.0, poll[0]),
                   "poll_wait_fraction": poll[2] / wall, "max_in_flight": s.max_in_flight,
                   **_in_flight_summary(in_flight_samples[0])},
    }
    if rate is not None:
        sent = json.loads((work / "sent.json").read_text())["sent_t"]
        latencies = [(r["recv_t"] - sent[r["key"]]) * 1000 for r in rows if 0 <= r["key"] < len(sent)]
        span = max(sent) - min(sent) if sent else 0.0
        out["target_rate"] = rate
        out["achieved_send_rate"] = (len(sent) - 1) / span if span > 0 else 0.0
        out["worker_latency_ms"] = out["latency_ms"]
        out["latency_ms"] = percentiles(latencies)
        out["latency_kind"] = "client: produce call -> result received (includes Kafka both ways)"
        if sent:  # the clock starts at the first send, not when the producer process was started
            out["wall_s"] = max(t_last - min(sent), 1e-9)
            out["images_per_s"] = len(rows) / out["wall_s"]
            out["gpu_thread_busy_fraction"] = inference_s / out["wall_s"]
    n = max(1, len(rows))
    out["cpu_ms_per_message"] = {k: round(v * 1000 / n, 3) for k, v in cpu.items()}
    out["cpu_busy_fraction"] = {k: round(v / out["wall_s"], 3) for k, v in cpu.items()}
    return out
