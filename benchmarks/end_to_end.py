"""The real worker (``worker.service.serve``), Kafka -> decode -> GPU thread -> Kafka, measured from outside.

Two modes, each on fresh topics and a fresh consumer group:

- ``preloaded``: the input topic holds ``count`` images before the worker starts; throughput is
  results / (last result received - first message consumed), so model loading and the group join are
  left out. Latencies are the worker's own (``timings_ms.end_to_end`` of each result: consumed ->
  published), which under a backlog mostly measure the wait among ``max_in_flight`` messages.
- ``rate``: the worker is started and has joined; a producer in a child process sends at a fixed rate;
  latency is send -> result received by the collector (both ``time.monotonic``), so it includes Kafka.

GPU thread busy fraction = the worker's ``worker_inference_seconds`` sum (per batch: assembly into the
pinned buffer, copies, inference, synchronize) over the measured wall time; ``gpu_batch_ms`` the same sum
per batch (the batch time of the latency criterion, ``round_trip.latency_bound``).

CPU per process group (``cpu_s``, ``cpu_ms_per_message``) counts from the run's first message
(``cpu_time``): the intakes each from their own first message, through a hook inside them.
"""

from __future__ import annotations

import asyncio
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import cpu_time, loadgen, stall
from benchmarks.corpus import Topics, preload
from worker.choices import ProcessingGuarantee
from worker.settings import Settings
from worker.supervisor import Supervisor


def percentiles(values_ms: list[float] | np.ndarray) -> dict:
    arr = np.asarray(values_ms, dtype=float)
    if arr.size == 0:
        return {"p50": None, "p95": None, "p99": None, "max": None, "mean": None}
    return {"p50": float(np.percentile(arr, 50)), "p95": float(np.percentile(arr, 95)),
            "p99": float(np.percentile(arr, 99)), "max": float(arr.max()), "mean": float(arr.mean())}


def middle_rate(times: list[float] | np.ndarray, share: float = 0.8) -> float | None:
    """Results per second over the middle ``share`` of a run: between the arrivals of the results at the
    (1 - share) / 2 and (1 + share) / 2 quantiles of arrival order. Beside the whole run's rate (the
    headline, unchanged) it shows how much of a short run went to filling the first batches and draining
    the last ones; None for fewer than 10 results or no time between the two."""
    t = np.sort(np.asarray(times, dtype=float))
    if t.size < 10:
        return None
    lo, hi = int(round((t.size - 1) * (1 - share) / 2)), int(round((t.size - 1) * (1 + share) / 2))
    span = t[hi] - t[lo]
    return float((hi - lo) / span) if span > 0 else None


def timeline(times: list[float] | np.ndarray, t0: float, bin_s: float = 0.05) -> list[int]:
    """Results received per ``bin_s`` from ``t0`` (the run's first message): where a short run's ramp and
    tail are."""
    t = np.asarray(times, dtype=float) - t0
    if t.size == 0:
        return []
    bins = int(np.floor(max(0.0, float(t.max())) / bin_s)) + 1
    return np.bincount(np.clip((t // bin_s).astype(int), 0, bins - 1), minlength=bins).tolist()


def longest_gap(times: list[float] | np.ndarray, t0: float) -> dict | None:
    """The longest time without a new result between the first and the last, and when it began (seconds
    from ``t0``, the run's first message). Results come in batches, so gaps of a batch's time are normal;
    hundreds of ms mean the GPU had nothing to do (run 23: librdkafka's pause dropping the intake's
    prefetched images, 250-450 ms every second). None for fewer than two results."""
    t = np.sort(np.asarray(times, dtype=float))
    if t.size < 2:
        return None
    gaps = np.diff(t)
    i = int(np.argmax(gaps))
    return {"ms": round(float(gaps[i]) * 1000, 1), "after_s": round(float(t[i] - t0), 3)}


def intake_spans(reports: list[dict], t0: float) -> list[list[float] | None]:
    """Each intake's [first message consumed, last message finished] in seconds from ``t0`` (the bench's
    hook inside it, polling: to ~20 ms): the intake that finishes last is the run's tail."""
    out: list[list[float] | None] = []
    for r in reports:
        first, last = r.get("t_first"), r.get("t_last")
        out.append(None if first is None or last is None else [round(first - t0, 3), round(last - t0, 3)])
    return out


def slowest_batches(rows: list[dict], t0: float, n: int = 3) -> list[dict]:
    """The ``n`` slowest GPU batches of a run: each result carries its batch's own GPU time
    (``timings_ms.inference``), so the results sharing one make a batch; with how many results it had and
    when the first of them was consumed, in seconds from ``t0`` (the run's first message). A slow batch at
    ~0 s is a start-up cost the warm-up missed (docs/benchmarks.md, run 22), one later is the steady state's."""
    batches: dict[float, list[float]] = {}  # GPU ms -> [results, first consumed]
    for r in rows:
        timings = r.get("timings_ms") or {}
        if r["dlq"] or "inference" not in timings or "end_to_end" not in timings:
            continue
        consumed = r["recv_t"] - timings["end_to_end"] / 1000.0 - t0
        batch = batches.setdefault(timings["inference"], [0, consumed])
        batch[0] += 1
        batch[1] = min(batch[1], consumed)
    slowest = sorted(batches.items(), key=lambda item: -item[0])[:n]
    return [{"ms": ms, "images": int(count), "consumed_at_s": round(at, 3)} for ms, (count, at) in slowest]


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
            raise RuntimeError(f"the worker stopped ({task.result()}) while the bench waited for {what}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        await asyncio.sleep(poll_s)
    return time.monotonic()


def _samples(exposition: bytes) -> dict[str, float]:
    """Every sample of a merged exposition summed over its labels (the processes), by name."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(exposition.decode("utf-8", "replace")):
        for sample in fam.samples:
            if "le" not in sample.labels:
                label = sample.labels.get("phase", sample.labels.get("decoded"))
                name = f"{sample.name}:{label}" if label is not None else sample.name
                out[name] = out.get(name, 0.0) + sample.value
    return out


def _gpu_pids(sups: list[Supervisor]) -> list[int]:
    procs = [p for sup in sups for p in (getattr(sup, "gpus", None) or [sup.gpu])]
    return [p.pid for p in procs if p is not None and p.pid]


def _pids(sups: list[Supervisor], collector: Any) -> dict[str, int]:
    """Every process of a run by name (for the stall evidence)."""
    out = {f"gpu-{i}": pid for i, pid in enumerate(_gpu_pids(sups))}
    out.update({f"intake-{i}": p.pid for i, p in enumerate(p for sup in sups for p in sup.intake_procs) if p.pid})
    out["collector"] = collector.pid
    return out


def _children_cpu(sups: list[Supervisor]) -> dict[str, float]:
    """CPU seconds so far of the GPU processes and of the intake processes (each group summed)."""
    return {"gpu_process": sum(cpu_time.process_cpu(pid) for pid in _gpu_pids(sups)),
            "intake_processes": sum(cpu_time.process_cpu(p.pid) for sup in sups for p in sup.intake_procs)}


async def _sample_cpu(sups: list[Supervisor], broker_pid: int | None, into: list, every_s: float = 0.01) -> None:
    """(time, GPU processes' CPU, broker's CPU) every ``every_s`` until cancelled: read at the first
    message afterwards (cpu_time.value_at), when it is known."""
    while True:
        into.append((time.monotonic(), sum(cpu_time.process_cpu(pid) for pid in _gpu_pids(sups)),
                     cpu_time.process_cpu(broker_pid) if broker_pid else 0.0))
        await asyncio.sleep(every_s)


async def worker_run(settings: Settings, bootstrap: str, images: list[bytes], distinct: list[bytes],
                     partitions: int, label: str, rate: float | None = None, rate_count: int = 0,
                     timeout_s: float = 600.0, broker_pid: int | None = None, replicas: int = 1) -> dict:
    """The worker from start to stop on fresh topics, as `worker run` runs it (a supervisor, its GPU
    process and intakes): preloaded ``images`` if ``rate`` is None, else ``rate_count`` messages sent at
    ``rate`` per second while it runs. ``replicas`` > 1 runs that many independent workers (one intake
    each, a GPU process each, one group): the "more replicas per GPU" alternative."""
    topics = Topics.fresh(label)
    await topics.create(bootstrap, partitions)
    expected = len(images) if rate is None else rate_count
    preload_s = await preload(bootstrap, topics.input, images, partitions) if rate is None else 0.0
    s = settings.replace(bootstrap_servers=bootstrap, input_topic=topics.input, output_topic=topics.output,
                         dlq_topic=topics.dlq, group_id=topics.group, http_port=0)
    work = Path(tempfile.mkdtemp(prefix="bench-"))
    ready = loadgen.new_event()
    progress = loadgen.new_counter()
    collector = loadgen.start(loadgen.collector_main, bootstrap, topics.output, topics.dlq, expected,
                              str(work / "collected.json"), ready, timeout_s, progress,
                              s.processing_guarantee != ProcessingGuarantee.EXACTLY_ONCE)
    while not ready.is_set():
        if not collector.is_alive():
            raise RuntimeError(f"bench collector exited with {collector.exitcode} before it was ready")
        await asyncio.sleep(0.02)

    sups = [Supervisor(s, intakes=1 if replicas > 1 else None, hooks=cpu_time.FirstMessageCpu())
            for _ in range(replicas)]
    t_start = time.monotonic()
    runs = [asyncio.create_task(sup.run()) for sup in sups]
    task = asyncio.gather(*runs)
    producer = None
    watcher: asyncio.Task | None = None
    cpu_samples: list[tuple[float, float, float]] = []
    sampler = asyncio.create_task(_sample_cpu(sups, broker_pid, cpu_samples))
    try:
        t_ready = await _wait_until(lambda: all(sup.health.readiness()[0] for sup in sups), task, timeout_s,
                                    "models to load and every intake to join", 0.02)
        cpu0 = _children_cpu(sups)
        broker0 = cpu_time.process_cpu(broker_pid) if broker_pid else 0.0
        if rate is not None:
            go = loadgen.new_event()
            producer = loadgen.start(loadgen.producer_main, bootstrap, topics.input, distinct, rate_count, rate,
                                     partitions, str(work / "sent.json"), go)
            go.set()
        waiters = [asyncio.create_task(loadgen.join(collector, timeout_s))]
        if producer is not None:
            waiters.append(asyncio.create_task(loadgen.join(producer, timeout_s)))
        children = asyncio.gather(*waiters)
        watcher = asyncio.create_task(stall.watch(progress, expected, sups, lambda: _pids(sups, collector), label,
                                                  bootstrap=bootstrap, topics=(topics.output, topics.dlq)))
        done, _ = await asyncio.wait({task, children, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if children not in done:
            children.cancel()
            if watcher in done:
                raise RuntimeError(f"the run stalled: {watcher.result()}")
            raise RuntimeError(f"the worker stopped early: {[r.result().exit_code for r in runs if r.done()]}")
        try:
            children.result()  # a child's failure or time-out
        except (RuntimeError, TimeoutError) as exc:  # how far it got tells a stall at the end from none at all
            raise RuntimeError(f"{exc}; results and DLQ records collected: {progress.value} of {expected}, "
                               f"{time.monotonic() - t_ready:.0f} s after the worker was ready") from exc
        sampler.cancel()
        # read as the last result arrived: the window from t_ready (the old count, kept to compare), and
        # each intake's CPU by pid for the count from its first message
        cpu_since_ready = {k: round(v - cpu0.get(k, 0.0), 3) for k, v in _children_cpu(sups).items()}
        if broker_pid:
            cpu_since_ready["broker_process"] = round(cpu_time.process_cpu(broker_pid) - broker0, 3)
        intake_end = {p.pid: cpu_time.process_cpu(p.pid) for sup in sups for p in sup.intake_procs}
        gpu_end = sum(cpu_time.process_cpu(pid) for pid in _gpu_pids(sups))
        broker_end = cpu_time.process_cpu(broker_pid) if broker_pid else 0.0
        for sup in sups:
            sup.request_stop()
        outcomes = await task
    finally:
        sampler.cancel()
        if watcher is not None:
            watcher.cancel()
        if not task.done():
            for sup in sups:
                sup.request_stop()
            await asyncio.gather(task, return_exceptions=True)
        for proc in (collector, producer):
            if proc is not None and proc.is_alive():
                proc.terminate()
    samples = [_samples(sup.final_metrics) for sup in sups]
    total = lambda name: sum(x.get(name, 0.0) for x in samples)  # noqa: E731
    counts: dict[str, int] = {}
    for o in outcomes:
        for k, v in o.counts.items():
            counts[k] = counts.get(k, 0) + v
    code = max(o.exit_code for o in outcomes)
    inference_s, batches, batch_images = (total("worker_inference_seconds_sum"), total("worker_batch_size_count"),
                                          total("worker_batch_size_sum"))
    poll = [total("worker_poll_records_count"), total("worker_poll_records_sum"),
            total("worker_poll_wait_seconds_total")]
    collected = json.loads((work / "collected.json").read_text())
    rows = collected["rows"]
    results = [r for r in rows if not r["dlq"]]
    # the first message consumed: each result says how long after its consumption it was published
    t_first = min((r["recv_t"] - r["timings_ms"]["end_to_end"] / 1000.0 for r in results), default=t_ready)
    recv = np.array([r["recv_t"] for r in rows]) if rows else np.array([t_first])
    t_last = float(recv.max())
    wall = max(t_last - t_first, 1e-9)
    intakes = cpu_time.intake_cpu(intake_end, [r for o in outcomes for r in o.reports])
    gpu0 = cpu_time.value_at([(t, g) for t, g, _ in cpu_samples], t_first)
    cpu = {"gpu_process": round(gpu_end - (gpu0 if gpu0 is not None else cpu0["gpu_process"]), 3),
           "intake_processes": intakes["cpu_s"]}
    if broker_pid:
        b0 = cpu_time.value_at([(t, b) for t, _, b in cpu_samples], t_first)
        cpu["broker_process"] = round(broker_end - (b0 if b0 is not None else broker0), 3)
    out = {
        "mode": "preloaded" if rate is None else "rate",
        "input_topic": topics.input,
        "settings": {"max_batch_size": s.max_batch_size, "max_wait_ms": s.max_wait_ms, "decoder": s.decoder,
                     "decode_threads": s.decode_threads, "max_in_flight": s.max_in_flight,
                     "partitions": partitions, "intake_processes": sups[0].k, "replicas": replicas},
        "count": expected,
        "results": len(results),
        "dead_lettered": len(rows) - len(results),
        "duplicates": collected["duplicates"],
        # the collector's reads from the start after 2 s with nothing new, and the results first seen after one
        "collector_rereads": collected.get("rereads", 0),
        "found_after_reread": collected.get("found_after_reread", 0),
        # records the broker served after a later one of their partition, taken on a seek back (gaps.py)
        "served_late": collected.get("served_late", 0),
        "missing": expected - len(rows),
        "worker_counts": counts,
        "exit_code": code,
        "startup_s": t_ready - t_start,
        "preload_s": preload_s,
        "wall_s": wall,
        "images_per_s": len(rows) / wall,
        "images_per_s_middle": middle_rate(recv),  # the middle 80% of the results: no ramp, no tail
        "results_per_50ms": timeline(recv, t_first),
        "longest_gap": longest_gap(recv, t_first),
        "intake_spans_s": intake_spans([r for o in outcomes for r in o.reports], t_first),
        "slowest_batches": slowest_batches(rows, t_first),
        "latency_ms": percentiles([r["timings_ms"]["end_to_end"] for r in results]),
        "latency_kind": "worker: consumed -> result published (timings_ms.end_to_end)",
        "stages_ms": _stages(rows),
        "batches": int(batches),
        "mean_batch_size": batch_images / batches if batches else 0.0,
        "gpu_batch_ms": inference_s * 1000 / batches if batches else None,
        "gpu_thread_busy_fraction": inference_s / wall,
        # the card's memory in use at the last batch (every process on it: cudaMemGetInfo), e.g. what a
        # session per batch shape (ort_batch_shapes=pow2) costs
        "gpu_memory_used_gib": round(total("worker_gpu_memory_used_bytes") / 2**30, 2),
        "gpu_phases_s": {k.split(":", 1)[1]: round(total(k), 3) for k in sorted(set().union(*samples))
                         if k.startswith("worker_gpu_phase_seconds_total:")},
        # per kind of batch (decoder=hybrid: card, rows, mixed): how many, and their mean own GPU time
        "gpu_batches_by_decode": {
            kind: {"batches": int(total(f"worker_gpu_batches_total:{kind}")),
                   "mean_ms": round(total(f"worker_gpu_batch_seconds_total:{kind}") * 1000
                                    / max(1.0, total(f"worker_gpu_batches_total:{kind}")), 2)}
            for kind in sorted(k.split(":", 1)[1] for k in set().union(*samples)
                               if k.startswith("worker_gpu_batches_total:"))},
        "cpu_s": cpu,
        "cpu_counted_from": "the first message (intakes: each its own first message; see cpu_time)",
        "cpu_s_since_ready": cpu_since_ready,  # the former count: from every intake joined (misses work before)
        "intake_cpu": intakes,
        # intake: records per poll, share of the wall time the consume loops (all intakes) waited in poll
        "intake": {"polls": int(poll[0]), "records_per_poll": poll[1] / max(1.0, poll[0]),
                   # since each intake started (its snapshot), so it includes the join: indicative only
                   "poll_wait_s_per_intake": poll[2] / max(1, sum(sup.k for sup in sups)),
                   "max_in_flight": s.max_in_flight},
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
