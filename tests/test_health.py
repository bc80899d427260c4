"""Probes and metrics: unit tests of the policy, and the real HTTP server of a running worker."""

from __future__ import annotations

import asyncio

import aiohttp

from tests.helpers import produce, read_all
from tests.test_end_to_end import lossless_images
from worker.broker import create_topics, free_port
from worker.health import STALE_AFTER_S, HealthState
from worker.service import serve


def test_liveness_needs_models_and_fresh_heartbeats():
    beat = [100.0]
    state = HealthState(gpu_heartbeat=lambda: beat[0])
    state.loop_heartbeat = 100.0
    assert state.liveness(now=100.0)[0] is False  # models not loaded yet: the startup probe waits
    state.models_ready = True
    assert state.liveness(now=100.0)[0] is True
    assert state.liveness(now=100.0 + STALE_AFTER_S + 1)[0] is False  # both heartbeats stale
    state.loop_heartbeat = 200.0
    ok, checks = state.liveness(now=200.0)
    assert ok is False and checks["gpu_heartbeat_age_s"] == 100.0  # GPU thread wedged
    beat[0] = 200.0
    state.gpu_alive = lambda: False
    assert state.liveness(now=200.0)[0] is False  # GPU thread dead


def test_readiness_needs_models_group_and_broker():
    state = HealthState(models_ready=True, joined=True, broker_ok=False)
    ok, checks = state.readiness()
    assert ok is False and checks["broker_reachable"] is False
    state.broker_ok = True
    assert state.readiness()[0] is True


async def _get(session, url):
    async with session.get(url) as resp:
        return resp.status, await resp.text()


async def test_endpoints_of_a_running_worker(settings):
    port = free_port()
    settings = settings.replace(http_port=port)
    await create_topics(settings.bootstrap_servers, [(settings.input_topic, 2), (settings.output_topic, 2),
                                                    (settings.dlq_topic, 1)])
    blobs, _ = lossless_images(12)
    await produce(settings.bootstrap_servers, settings.input_topic, blobs + [b"garbage"], 2)
    workers: list = []
    task = asyncio.create_task(serve(settings, worker_out=workers))
    base = f"http://127.0.0.1:{port}"
    async with aiohttp.ClientSession() as session:
        await read_all(settings.bootstrap_servers, settings.output_topic, 12)
        await read_all(settings.bootstrap_servers, settings.dlq_topic, 1)
        for _ in range(100):  # readiness follows the group join and a broker round trip
            status, body = await _get(session, f"{base}/readyz")
            if status == 200:
                break
            await asyncio.sleep(0.1)
        assert status == 200, body
        status, body = await _get(session, f"{base}/healthz")
        assert status == 200, body
        for _ in range(100):  # wait for the first commit of the finished offsets
            status, metrics = await _get(session, f"{base}/metrics")
            assert status == 200
            if "worker_commits_total 0.0" not in metrics:
                break
            await asyncio.sleep(0.1)
    workers[0].request_stop()
    assert await task == 0

    def value(line_start: str) -> float:
        lines = [ln for ln in metrics.splitlines() if ln.startswith(line_start)]
        assert lines, f"{line_start} missing from /metrics"
        return float(lines[0].rsplit(" ", 1)[1])

    assert value("worker_messages_consumed_total") == 13
    assert value("worker_messages_published_total") == 12
    assert value('worker_messages_dead_lettered_total{reason="unsupported_image"}') == 1
    assert value("worker_batch_size_count") >= 1
    assert value("worker_batch_size_sum") == 12  # warm-up batches are not traffic
    assert value("worker_commits_total") >= 1
    assert value("worker_end_to_end_seconds_count") == 13
    assert value("worker_decode_queue_depth") == 0 and value("worker_in_flight_messages") == 0
    for name in ("worker_inference_seconds_bucket", "worker_decode_seconds_bucket", "worker_queue_seconds_bucket",
                 "worker_consumer_lag_messages", "worker_gpu_memory_used_bytes", "worker_in_flight_messages",
                 "worker_rebalances_total", "worker_build_info", "worker_gpu_queue_depth"):
        assert name in metrics, f"{name} missing from /metrics"


def test_broker_outage_is_logged_once_each_way_whichever_source_noticed(capsys):
    """The probe, a send and a start-up attempt all report through broker_state: one 'unreachable' per
    outage, one 'reachable again' when any of them next succeeds, nothing at the first success."""
    import json

    from worker import log
    from worker.health import HealthState

    log.configure("json", "info")
    state = HealthState()
    state.broker_state(True)  # start-up: reachable for the first time, not "again"
    state.broker_state(False, "KafkaConnectionError: refused")  # the probe
    state.broker_state(False, "KafkaTimeoutError")  # a send, same outage
    state.broker_state(True)  # a send got its ack
    state.broker_state(True)  # the probe
    events = [json.loads(line)["event"] for line in capsys.readouterr().err.splitlines() if line.startswith("{")]
    assert events == ["broker unreachable", "broker reachable again"]
