"""Kafka-tier cases whose tansu twins live elsewhere, where Apache Kafka behaves differently.

The replay's multi-record-batch case (tests/test_replay.py) is about tansu's short end offset; on Kafka
the end offset is true; this case also proves that a replay on Kafka finds the topic's partitions (it once
took them from the consumer's cached metadata, empty on Kafka without a subscription, and reported
"complete" having replayed nothing).
"""

from __future__ import annotations

import shutil

import pytest

from tests.test_replay import test_until_end_covers_multi_record_batches as _until_end_over_multi_record_batches

pytestmark = pytest.mark.kafka


@pytest.mark.parametrize("broker", ["kafka"], indirect=True)
async def test_replay_until_end_covers_multi_record_batches_on_kafka(settings):
    await _until_end_over_multi_record_batches(settings)


def test_the_cluster_id_never_reads_as_an_option():
    from tests.kafka_broker import _cluster_id

    ids = [_cluster_id() for _ in range(2000)]  # about 31 of 2000 random ids start with "-"
    assert not [i for i in ids if i.startswith("-")] and all(len(i) == 22 for i in ids)


def test_a_kafka_that_fails_its_start_is_not_left_running(monkeypatch):
    """The broker runs in its own session, so nothing stops it with us: a start that fails after the
    process was launched (here the readiness probe raises, as it once did when called inside an event
    loop) stops it before the error propagates."""
    import os

    from tests.kafka_broker import KafkaBroker, tools_missing

    why = tools_missing()
    if why:
        pytest.skip(why)
    broker = KafkaBroker(tls=False)

    def probe_fails() -> bool:
        raise RuntimeError("probe failed")

    monkeypatch.setattr(broker, "_answers_metadata", probe_fails)
    with pytest.raises(RuntimeError, match="probe failed"):
        broker.start()
    assert broker._proc is not None and broker._proc.poll() is not None
    with pytest.raises(ProcessLookupError):
        os.kill(broker._proc.pid, 0)


def _plaintext_properties(**kwargs):
    """A PLAINTEXT-only KafkaBroker (not started) and its server.properties as a dict; its home removed."""
    from tests.kafka_broker import KafkaBroker

    broker = KafkaBroker(tls=False, **kwargs)
    shutil.rmtree(broker.home)
    return broker, dict(line.split("=", 1) for line in broker._properties().splitlines())


def test_a_plaintext_only_kafka_needs_no_certificates():
    """``tls=False`` (the bench's --broker kafka): two listeners, no TLS or SASL settings to point at."""
    broker, props = _plaintext_properties()
    assert set(broker.ports) == {"PLAINTEXT", "CONTROLLER"} and broker.ssl == broker.sasl_ssl == broker.mtls == ""
    assert props["listener.security.protocol.map"] == "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT"
    assert not [k for k in props if k.startswith(("ssl.", "sasl.", "listener.name."))]
    assert props["group.initial.rebalance.delay.ms"] == "0"  # a test's lone consumer joins at once


def test_the_initial_rebalance_delay_is_the_callers():
    """The bench asks for Kafka's own default (3 s), so that a pod's intakes share the group's first generation."""
    from benchmarks.harness import KAFKA_INITIAL_REBALANCE_DELAY_MS

    _, props = _plaintext_properties(initial_rebalance_delay_ms=KAFKA_INITIAL_REBALANCE_DELAY_MS)
    assert props["group.initial.rebalance.delay.ms"] == "3000"
