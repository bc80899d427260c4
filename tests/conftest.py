"""Shared fixtures: real Kafka-protocol brokers per test session, on free loopback ports.

``broker`` is tansu (fast, embedded) unless a test is parametrised with ``tests.kafka_broker.both_brokers``
(or asks for ``kafka``): then it also runs against Apache Kafka 4.x (``tests/kafka_broker.py``), marked
``kafka`` so that ``pytest -m kafka`` runs that tier alone. Without java/mvn/openssl the Kafka cases skip
with one reason; with them, a failing Maven fetch or start is an error, never a skip.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid

import pytest

from worker.broker import LocalBroker, create_topics
from worker.settings import Settings


@pytest.fixture(scope="session")
def tansu():
    with LocalBroker() as b:
        yield b


@pytest.fixture(scope="session")
def kafka(request):
    from tests.kafka_broker import KafkaBroker, tools_missing

    why = tools_missing()
    if why:
        pytest.skip(why)
    t0 = time.monotonic()
    with KafkaBroker() as k:
        line = (f"Kafka tier: Apache Kafka {k.version}, single-node KRaft on {k.bootstrap} "
                f"(started in {time.monotonic() - t0:.1f}s; logs {k.home / 'logs'})")
        _KAFKA_LINES.append(line)
        reporter = request.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line("")
            reporter.write_line(line)
        yield k


@pytest.fixture(scope="session")
def broker(request):
    """tansu, or the broker named by an indirect parametrisation ("tansu" | "kafka")."""
    return request.getfixturevalue(getattr(request, "param", "tansu"))


_KAFKA_LINES: list[str] = []


def pytest_terminal_summary(terminalreporter):
    for line in _KAFKA_LINES:
        terminalreporter.write_line(line)


@pytest.fixture
def topics(broker):
    """Fresh topic names for one test (tansu: memory storage; Kafka: a temporary folder)."""
    tag = uuid.uuid4().hex[:8]
    return {"input": f"images-{tag}", "output": f"results-{tag}", "dlq": f"dlq-{tag}", "group": f"g-{tag}"}


@pytest.fixture
def settings(broker, topics, tmp_path) -> Settings:
    return Settings(bootstrap_servers=broker.bootstrap, input_topic=topics["input"],
                    output_topic=topics["output"], dlq_topic=topics["dlq"], group_id=topics["group"],
                    http_port=0, device="cpu", max_batch_size=16, max_wait_ms=5.0, decode_workers=2,
                    commit_interval_ms=200, drain_timeout_s=10.0,
                    session_timeout_ms=6000,  # tansu holds a join for about half of it
                    log_format="json", log_level="warning")


@pytest.fixture
def make_topics(broker):
    def _make(*pairs: tuple[str, int]) -> None:
        asyncio.run(create_topics(broker.bootstrap, pairs))
    return _make


@pytest.fixture(autouse=True, scope="session")
def _model_cache(tmp_path_factory):
    # Bundled models are generated once per session into a private cache.
    os.environ.setdefault("WORKER_MODEL_CACHE", str(tmp_path_factory.mktemp("models")))


@pytest.fixture(autouse=True)
def _quiet_logs():
    # Workers run inside the test process: JSON at warning keeps failures readable. Per test, because a
    # test that configures logging onto its captured stderr leaves a closed stream behind it.
    from worker import log

    log.configure("json", "warning")
