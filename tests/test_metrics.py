"""What /metrics carries besides the worker's own series: standard process and GC collectors per
process (labelled by the supervisor's merge), no ``_created`` series, and ``worker_ready``."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from worker.health import HealthState, exposition
from worker.metrics import Metrics, merge_expositions


def families(text: bytes) -> dict[str, list]:
    return {f.name: f.samples for f in text_string_to_metric_families(text.decode())}


def test_no_created_series():
    m = Metrics()
    m.consumed.inc()
    m.dead_lettered.labels("too_large").inc()
    m.batch_size.observe(8)
    text = m.exposition().decode()
    assert "worker_messages_consumed_total 1.0" in text
    assert 'worker_messages_dead_lettered_total{reason="too_large"} 1.0' in text
    assert "_created" not in text


def test_process_and_gc_collectors_are_labelled_by_process_after_the_merge():
    merged = families(merge_expositions({"gpu": Metrics().exposition(), "intake-1": Metrics().exposition()}))
    for name in ("process_resident_memory_bytes", "process_cpu_seconds", "process_open_fds",
                 "python_gc_collections", "python_info"):
        assert name in merged, name
    rss = {s.labels["process"]: s.value for s in merged["process_resident_memory_bytes"]}
    assert set(rss) == {"gpu", "intake-1"} and all(v > 0 for v in rss.values())
    gc = {(s.labels["process"], s.labels["generation"]) for s in merged["python_gc_collections"]}
    assert {("gpu", "0"), ("intake-1", "2")} <= gc
    # Every family once, even though each process exports it.
    text = merge_expositions({"gpu": Metrics().exposition(), "intake-1": Metrics().exposition()}).decode()
    assert text.count("# TYPE process_resident_memory_bytes gauge") == 1


def test_worker_ready_follows_readiness():
    state, metrics = HealthState(), Metrics()
    assert families(exposition(state, metrics))["worker_ready"][0].value == 0.0
    state.models_ready = state.joined = state.broker_ok = True
    assert families(exposition(state, metrics))["worker_ready"][0].value == 1.0
    state.publish_stalled(True)
    assert families(exposition(state, metrics))["worker_ready"][0].value == 0.0
