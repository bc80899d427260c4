"""kafka_consumer=librdkafka: the live intake's consumer on librdkafka (worker.intake.rdkafka_consumer).

The delivery tests (tests/test_end_to_end.py, test_faults.py, test_processes.py) run with both consumers;
here: its configuration (librdkafka itself validates it), which plans get it, how record errors are
told apart, and against the real broker that a revoke's hook runs to its end before another member is
given the partitions.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time

import confluent_kafka
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from tests.kafka_broker import both_brokers
from worker.broker import create_topics
from worker.errors import ConfigError
from worker.intake import rdkafka_consumer
from worker.intake.clients import ClientsMixin
from worker.intake.consume import LivePlan, RebalanceHooks
from worker.intake.rdkafka_consumer import RdKafkaConsumer, RdKafkaError
from worker.replay import ReplayPlan
from worker.settings import Settings


def test_config_carries_the_settings_and_librdkafka_accepts_it():
    s = Settings(bootstrap_servers="127.0.0.1:1", check_crcs=False, fetch_max_bytes=8 << 20,
                 max_partition_fetch_bytes=2 << 20, fetch_max_wait_ms=50, auto_offset_reset="latest")
    conf = rdkafka_consumer.config(s, "g1")
    assert conf["group.id"] == "g1" and conf["enable.auto.commit"] is False
    assert conf["check.crcs"] is False and conf["auto.offset.reset"] == "latest"
    assert (conf["fetch.max.bytes"], conf["max.partition.fetch.bytes"], conf["fetch.wait.max.ms"]) == (8 << 20, 2 << 20, 50)
    assert conf["queued.max.messages.kbytes"] == 8192  # its prefetch: one fetch, not librdkafka's 64 MB
    assert conf["isolation.level"] == "read_uncommitted" and conf["security.protocol"] == "PLAINTEXT"
    confluent_kafka.Consumer(conf).close()  # librdkafka refuses an unknown or invalid property here


def test_config_maps_tls_and_sasl():
    s = Settings(bootstrap_servers="b:9093", security_protocol="SASL_SSL", sasl_mechanism="SCRAM-SHA-512",
                 sasl_username="u", sasl_password="p", ssl_cafile="/ca.pem")
    conf = rdkafka_consumer.config(s, "g")
    assert conf["security.protocol"] == "SASL_SSL" and conf["sasl.mechanism"] == "SCRAM-SHA-512"
    assert (conf["sasl.username"], conf["sasl.password"], conf["ssl.ca.location"]) == ("u", "p", "/ca.pem")
    assert "ssl.certificate.location" not in conf  # unset files are left to librdkafka's defaults


def test_a_large_fetch_raises_the_largest_response_librdkafka_takes():
    conf = rdkafka_consumer.config(Settings(fetch_max_bytes=200_000_000), "g")
    assert conf["receive.message.max.bytes"] == 200_000_512


async def test_a_configuration_librdkafka_refuses_is_a_config_error_naming_it():
    # librdkafka wants max.poll.interval.ms >= session.timeout.ms; the worker's own checks do not know that
    s = Settings(bootstrap_servers="127.0.0.1:1", session_timeout_ms=60000, max_poll_interval_ms=10000)
    with pytest.raises(ConfigError, match="librdkafka refused the configuration: .*max.poll.interval.ms"):
        await RdKafkaConsumer(rdkafka_consumer.config(s, "g")).start()


def test_librdkafka_with_exactly_once_is_refused_at_load():
    with pytest.raises(ConfigError, match="kafka_consumer=librdkafka cannot be combined"):
        Settings(kafka_consumer="librdkafka", processing_guarantee="exactly-once")
    assert Settings(kafka_consumer="LIBRDKAFKA").kafka_consumer == "librdkafka"


class _Clients(ClientsMixin):
    def __init__(self, settings: Settings, plan) -> None:
        self.settings, self.plan, self.exactly_once = settings, plan, False


async def test_a_live_plan_gets_librdkafka_and_a_replay_keeps_aiokafka():
    s = Settings(kafka_consumer="librdkafka", bootstrap_servers="127.0.0.1:1")
    assert isinstance(_Clients(s, LivePlan("images", "g"))._new_consumer(), RdKafkaConsumer)
    replay = ReplayPlan.__new__(ReplayPlan)  # its type is what counts; a replay assigns and seeks by hand
    replay.group_id = "g-replay"
    assert isinstance(_Clients(s, replay)._new_consumer(), AIOKafkaConsumer)
    plain = dataclasses.replace(s, kafka_consumer="aiokafka")
    assert isinstance(_Clients(plain, LivePlan("images", "g"))._new_consumer(), AIOKafkaConsumer)


class _Message:
    def topic(self) -> str:
        return "images"

    def partition(self) -> int:
        return 3

    def offset(self) -> int:
        return 42


@pytest.mark.parametrize("code", [confluent_kafka.KafkaError._BAD_MSG, confluent_kafka.KafkaError._BAD_COMPRESSION,
                                  confluent_kafka.KafkaError.TOPIC_AUTHORIZATION_FAILED])
def test_a_corrupt_batch_or_a_refused_topic_stops_the_intake(code):
    # librdkafka would go on past a batch it cannot read: its records would be lost, so it is fatal
    consumer = RdKafkaConsumer({})
    with pytest.raises(RdKafkaError, match="topic=images partition=3 offset=42"):
        consumer._message_error(confluent_kafka.KafkaError(code), _Message())


@pytest.mark.parametrize("code", [confluent_kafka.KafkaError.UNKNOWN_TOPIC_OR_PART, confluent_kafka.KafkaError._TRANSPORT,
                                  confluent_kafka.KafkaError._PARTITION_EOF])
def test_a_missing_topic_or_a_lost_connection_is_waited_for(code):
    RdKafkaConsumer({})._message_error(confluent_kafka.KafkaError(code), _Message())  # logged, no raise


@both_brokers
@pytest.mark.timeout(120)
async def test_a_revoke_runs_its_hook_to_the_end_before_another_member_gets_the_partitions(broker, topics):
    """The callback blocks librdkafka's rebalance until the worker's async hook (drain, flush, commit) is
    done: the member that joins is assigned the partitions only after the hook ended."""
    await create_topics(broker.bootstrap, [(topics["input"], 4)])
    settings = Settings(bootstrap_servers=broker.bootstrap, session_timeout_ms=6000, fetch_max_wait_ms=50)
    events: list[tuple[str, float, frozenset]] = []

    async def assigned(tps: set) -> None:
        events.append(("assigned", time.monotonic(), frozenset(tps)))

    async def revoked(tps: set) -> None:
        events.append(("revoke starts", time.monotonic(), frozenset(tps)))
        await asyncio.sleep(1.5)  # a drain that takes a while
        events.append(("revoke ends", time.monotonic(), frozenset(tps)))

    first = RdKafkaConsumer(rdkafka_consumer.config(settings, topics["group"]))
    await first.start()
    first.subscribe([topics["input"]], listener=RebalanceHooks(revoked, assigned))
    polling = True

    async def poll() -> None:
        while polling:
            await first.getmany(timeout_ms=50, max_records=100)
    poller = asyncio.create_task(poll())
    try:
        for _ in range(300):
            if first.assignment():
                break
            await asyncio.sleep(0.05)
        assert len(first.assignment()) == 4
        second = AIOKafkaConsumer(bootstrap_servers=broker.bootstrap, group_id=topics["group"],
                                  session_timeout_ms=6000, enable_auto_commit=False)
        second_assigned: list[tuple[float, frozenset]] = []

        async def second_got(tps: set) -> None:
            if tps:
                second_assigned.append((time.monotonic(), frozenset(tps)))

        async def nothing(tps: set) -> None:
            pass
        await second.start()
        second.subscribe([topics["input"]], listener=RebalanceHooks(nothing, second_got))
        try:
            for _ in range(300):
                await second.getmany(timeout_ms=100)
                if second_assigned:
                    break
        finally:
            await second.stop()
    finally:
        polling = False
        await poller
        await first.stop()
    ends = [t for name, t, _ in events if name == "revoke ends"]
    assert second_assigned and ends, events
    assert ends[0] < second_assigned[0][0], "the other member got partitions while the revoke hook still ran"
    assert all(isinstance(tp, TopicPartition) for tp in second_assigned[0][1])
