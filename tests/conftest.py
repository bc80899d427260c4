"""Shared fixtures: one real Kafka-protocol broker (tansu) per test session, on a free loopback port."""

from __future__ import annotations

import asyncio
import os
import uuid

import pytest

from worker.broker import LocalBroker, create_topics
from worker.settings import Settings


@pytest.fixture(scope="session")
def broker():
    with LocalBroker() as b:
        yield b


@pytest.fixture
def topics(broker):
    """Fresh topic names for one test (memory storage: nothing to clean up)."""
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
