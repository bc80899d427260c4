"""Prometheus metrics. Names follow Prometheus conventions: ``_total`` counters, base units.

One registry per worker (not the global default), so tests and `worker demo` can run several workers
in one process. prometheus_client is thread-safe: the GPU thread records its own batch metrics.

Each registry also carries the standard process (CPU, resident memory, open files), GC and platform
collectors; in `worker run` every child writes its own snapshot and the supervisor's merge labels each
series with ``process``, so ``process_resident_memory_bytes{process="intake-2"}`` is that intake's memory.
No ``_created`` series: they double the counters' and histograms' series and dashboards never use them.
"""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    GCCollector,
    Gauge,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)

from worker import __version__

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)

disable_created_metrics()


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=r)
        GCCollector(registry=r)
        PlatformCollector(registry=r)
        self.consumed = Counter("worker_messages_consumed", "Messages read from the input topic.", registry=r)
        self.published = Counter("worker_messages_published", "Results acknowledged by the broker.", registry=r)
        self.dead_lettered = Counter("worker_messages_dead_lettered", "DLQ records acknowledged, by reason.",
                                     ["reason"], registry=r)
        self.failed = Counter("worker_messages_failed",
                              "Messages that failed retriably (not committed; redone after restart).",
                              ["reason"], registry=r)
        self.batch_size = Histogram("worker_batch_size", "Images per GPU micro-batch.",
                                    buckets=BATCH_BUCKETS, registry=r)
        self.decode_seconds = Histogram("worker_decode_seconds", "Decode and CPU pre-processing per image.",
                                        buckets=LATENCY_BUCKETS, registry=r)
        self.queue_seconds = Histogram("worker_queue_seconds", "Wait in the GPU queue per image.",
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.inference_seconds = Histogram("worker_inference_seconds", "Device time per batch, all models.",
                                           buckets=LATENCY_BUCKETS, registry=r)
        self.end_to_end_seconds = Histogram("worker_end_to_end_seconds",
                                            "From consume to broker ack of the result, per message.",
                                            buckets=LATENCY_BUCKETS, registry=r)
        # Intake: records per poll, and the consume loop's time waiting for the broker. Few records per poll
        # and a loop mostly waiting, with work in flight well under max_in_flight, mean the fetch path (not
        # the GPU) bounds the worker.
        self.poll_records = Histogram("worker_poll_records", "Records returned by one poll of the consumer.",
                                      buckets=(0, 1, 4, 16, 64, 256, 1024), registry=r)
        self.poll_wait_seconds = Counter("worker_poll_wait_seconds", "Time the consume loop spent in poll.",
                                         registry=r)
        self.gpu_decoding = Gauge("worker_gpu_decoding", "1 while JPEGs are decoded on the GPU (decoder=nvimgcodec "
                                  "started); 0 when decoding on the CPU, by choice or by fallback.", registry=r)
        self.gpu_decode_fallbacks = Counter("worker_gpu_decode_fallbacks", "JPEGs nvImageCodec could not decode, "
                                            "decoded by OpenCV on the GPU thread instead.", registry=r)
        self.gpu_phase_seconds = Counter("worker_gpu_phase_seconds", "GPU thread time per batch phase: decode "
                                         "(device decoding's host part, not prefetched), enqueue (rows written, "
                                         "models queued; with CPU decoding the whole launch), prefetch (next "
                                         "batch's decode under this one's inference, or handing it to the decode "
                                         "thread), decode_wait (for the decode thread's result), wait (for the "
                                         "device); decode_thread: the decode thread's own time.",
                                         ["phase"], registry=r)
        self.gpu_batches_decoded = Counter("worker_gpu_batches", "Batches the GPU thread ran, by where their "
                                           "images were decoded: card (every one a JPEG decoded on the GPU), "
                                           "rows (every one by an intake), mixed.", ["decoded"], registry=r)
        self.gpu_batch_seconds = Counter("worker_gpu_batch_seconds", "Each batch's own GPU time (as in "
                                         "worker_inference_seconds), by where its images were decoded.",
                                         ["decoded"], registry=r)
        self.in_flight = Gauge("worker_in_flight_messages", "Consumed and not yet finished.", registry=r)
        # The bounds of docs/guarantees.md "Bounds and deadlines", per intake process.
        self.in_flight_bytes = Gauge("worker_in_flight_bytes", "Value bytes of started, unfinished messages "
                                     "(at most max_in_flight_bytes, or one larger message alone).", registry=r)
        self.waiting_bytes = Gauge("worker_fetched_waiting_bytes", "Value bytes of fetched messages waiting "
                                   "for room under max_in_flight_bytes (at most one fetch's worth).", registry=r)
        self.uncommitted_span = Gauge("worker_uncommitted_span_messages", "Finished messages held behind an "
                                      "unfinished lower offset of their partition.", registry=r)
        self.oldest_in_flight = Gauge("worker_oldest_in_flight_seconds", "Age of the oldest unfinished message "
                                      "(time the broker was away or publishing stalled not counted).", registry=r)
        self.gpu_queue_depth = Gauge("worker_gpu_queue_depth", "Requests waiting for the GPU thread.",
                                     registry=r)
        self.gpu_requests = Counter("worker_gpu_requests", "Requests this intake sent to each GPU process "
                                    "(gpu: its device index; the least outstanding work gets the next).",
                                    ["gpu"], registry=r)
        self.decode_queue_depth = Gauge("worker_decode_queue_depth", "Messages waiting for or in decode.",
                                        registry=r)
        self.paused = Gauge("worker_partitions_paused", "1 while backpressure pauses consumption.", registry=r)
        # By consumer group (a replay Job's group is not the live one), for the partitions owned now: a
        # revoked partition's series goes (drop_lag), or it would stay at its last value for ever.
        self.lag = Gauge("worker_consumer_lag_messages", "End offset minus committed offset, per partition "
                         "this process owns.", ["group", "topic", "partition"], registry=r)
        self.commits = Counter("worker_commits", "Offset commits sent to the broker.", registry=r)
        self.commit_failures = Counter("worker_commit_failures", "Offset commits that failed.", registry=r)
        self.rebalances = Counter("worker_rebalances", "Partition assignments (kind: assigned, revoked, lost).",
                                  ["kind"], registry=r)
        self.gpu_memory = Gauge("worker_gpu_memory_used_bytes", "Device memory in use on our GPU.",
                                registry=r)
        self.build = Info("worker_build", "Build information.", registry=r)
        self.build.info({"version": __version__})

    def set_lag(self, group: str, topic: str, partition: int, messages: int) -> None:
        self.lag.labels(group, topic, str(partition)).set(max(0, messages))

    def drop_lag(self, group: str, topic: str, partition: int) -> None:
        """Remove one partition's lag series (no error when there is none)."""
        try:
            self.lag.remove(group, topic, str(partition))
        except KeyError:
            pass

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


def write_snapshot(metrics: Metrics, path: str) -> None:
    """This process's exposition, for the supervisor's merged ``/metrics`` (written atomically)."""
    import os

    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        f.write(metrics.exposition())
    os.replace(tmp, path)


def merge_expositions(texts: dict[str, bytes], labels: dict[str, dict[str, str]] | None = None) -> bytes:
    """One exposition of several processes' snapshots, each series labelled ``process=<name>`` (and with
    ``labels[name]``: ``gpu="1"`` on every series of GPU process gpu-1), every metric family once (sums
    across processes are the query's job: ``sum without (process)``)."""
    from prometheus_client.metrics_core import Metric
    from prometheus_client.parser import text_string_to_metric_families
    from prometheus_client.samples import Sample

    families: dict[str, Metric] = {}
    for process, text in sorted(texts.items()):
        for fam in text_string_to_metric_families(text.decode("utf-8", "replace")):
            merged = families.get(fam.name)
            if merged is None:
                merged = families[fam.name] = Metric(fam.name, fam.documentation, fam.type, fam.unit)
            for s in fam.samples:
                extra = (labels or {}).get(process, {})
                merged.samples.append(Sample(s.name, {**s.labels, "process": process, **extra}, s.value,
                                             s.timestamp, s.exemplar))

    class _Collected:
        def collect(self) -> list[Metric]:
            return list(families.values())

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collected())  # type: ignore[arg-type]
    return generate_latest(registry)
