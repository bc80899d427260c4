"""kafka_producer=librdkafka: the intake's producer on confluent-kafka behind the calls Publisher makes
(worker.intake.rdkafka_producer). Its configuration and error mapping (pure), then against the real broker:
keyed records land where aiokafka's partitioner puts them, batches and single sends are acknowledged,
a record too large is told apart, and its thread ends.
The topic checks and a topic that cannot be written: tests/test_publish_failures.py, with each producer;
the end-to-end and fault tests run with it too (tests/helpers.py ``kafka_clients``)."""

from __future__ import annotations

import asyncio
import sys
import threading

import confluent_kafka
import pytest
from aiokafka import AIOKafkaConsumer
from aiokafka import errors as E
from aiokafka.partitioner import DefaultPartitioner

from worker import log
from worker.broker import create_topics, free_port
from worker.errors import ConfigError
from worker.intake import rdkafka_producer
from worker.intake.publish import Publisher, RecordTooLarge, classify
from worker.intake.rdkafka_common import as_aiokafka
from worker.intake.rdkafka_producer import RdKafkaProducer, _Batch
from worker.intake.records import Record
from worker.settings import Settings

pytestmark = pytest.mark.timeout(120)
K = confluent_kafka.KafkaError


@pytest.fixture(autouse=True)
def _log_to_this_tests_stderr():
    log.configure("json", "warning", stream=sys.stderr)


def _producer(bootstrap: str, **settings) -> RdKafkaProducer:
    s = Settings(bootstrap_servers=bootstrap, **settings)
    return RdKafkaProducer(rdkafka_producer.config(s, None))


# --- pure -------------------------------------------------------------------------------------------
def test_config_carries_the_aiokafka_producers_options():
    s = Settings(bootstrap_servers="b:9092", client_id="me", producer_linger_ms=3, producer_max_request_size=5_000_000,
                 security_protocol="SASL_SSL", sasl_mechanism="SCRAM-SHA-512", sasl_username="u", sasl_password="p",
                 ssl_cafile="/ca.pem")
    conf = rdkafka_producer.config(s, "zstd")
    assert conf["bootstrap.servers"] == "b:9092" and conf["client.id"] == "me"
    assert conf["acks"] == "all" and conf["linger.ms"] == 3 and conf["message.max.bytes"] == 5_000_000
    assert conf["compression.type"] == "zstd" and conf["partitioner"] == "murmur2_random"
    assert conf["security.protocol"] == "SASL_SSL" and conf["sasl.mechanism"] == "SCRAM-SHA-512"
    assert conf["sasl.username"] == "u" and conf["ssl.ca.location"] == "/ca.pem"
    assert rdkafka_producer.config(Settings(), None)["compression.type"] == "none"


def test_librdkafka_producer_with_exactly_once_is_refused():
    with pytest.raises(ConfigError, match="kafka_producer=librdkafka cannot be combined"):
        Settings(kafka_producer="librdkafka", processing_guarantee="exactly-once")
    assert Settings(kafka_producer="LIBRDKAFKA").kafka_producer == "librdkafka"


@pytest.mark.parametrize("code, cls, kind", [
    (K.MSG_SIZE_TOO_LARGE, E.MessageSizeTooLargeError, "retriable"),  # Publisher catches it before classify
    (K.TOPIC_AUTHORIZATION_FAILED, E.TopicAuthorizationFailedError, "permanent"),
    (K.TOPIC_EXCEPTION, E.InvalidTopicError, "permanent"),
    (K.UNKNOWN_TOPIC_OR_PART, E.UnknownTopicOrPartitionError, "missing"),
    (K._UNKNOWN_TOPIC, E.UnknownTopicOrPartitionError, "missing"),
    (K.NOT_LEADER_FOR_PARTITION, E.NotLeaderForPartitionError, "retriable"),
    (K._MSG_TIMED_OUT, E.KafkaTimeoutError, "retriable"),
    (K._TRANSPORT, E.KafkaConnectionError, "retriable"),
    (K._ALL_BROKERS_DOWN, E.KafkaConnectionError, "retriable"),
    (K._PURGE_QUEUE, E.ProducerClosed, "permanent"),
    (K._CONFLICT, E.KafkaError, "retriable"),  # nothing nearer: retried, readiness shows a stall
])
def test_librdkafka_errors_become_the_aiokafka_errors_publisher_tells_apart(code, cls, kind):
    err = as_aiokafka(K(code))
    assert type(err) is cls
    if cls is not E.MessageSizeTooLargeError:
        assert classify(err) == kind
    assert K(code).name() in str(err)


def test_a_fatal_librdkafka_error_is_permanent():
    err = as_aiokafka(K(K._FENCED, "fenced", fatal=True))
    assert classify(err) == "permanent" and "fatal" in str(err)


def test_a_batch_takes_records_until_its_size_and_refuses_one_too_large_even_alone():
    batch = _Batch(1000)
    assert batch.append(timestamp=None, key=b"k", value=b"x" * 400, headers=[("h", b"v")])
    assert batch.append(timestamp=None, key=None, value=b"x" * 400, headers=None)
    assert batch.append(timestamp=None, key=None, value=b"x" * 400, headers=None) is None  # full
    assert len(batch.records) == 2
    assert _Batch(1000).append(timestamp=None, key=None, value=b"x" * 2000, headers=None) is None


# --- the real broker --------------------------------------------------------------------------------
async def _read(bootstrap: str, topic: str, n: int) -> list:
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=None, auto_offset_reset="earliest")
    await consumer.start()
    out: list = []
    try:
        async with asyncio.timeout(30):
            while len(out) < n:
                for records in (await consumer.getmany(timeout_ms=200)).values():
                    out.extend(records)
    finally:
        await consumer.stop()
    return out


def _acks_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "rdkafka-acks"]


async def test_batches_and_single_sends_land_where_aiokafkas_partitioner_puts_each_key(broker, topics):
    topic, partitions = topics["output"], 6
    await create_topics(broker.bootstrap, [(topic, partitions)])
    producer = _producer(broker.bootstrap)
    pub = Publisher(producer, 100)
    await pub.start()
    try:
        await pub.check_topics([topic])
        records = [Record(f"v{i}".encode(), f"key-{i}".encode(), [("n", str(i).encode())], None) for i in range(200)]
        assert await pub.publish_many(topic, records[:150]) == [None] * 150  # by produce batches
        for r in records[150:]:
            await pub.publish(topic, r)  # alone: librdkafka's murmur2 partitioner places it
        await pub.flush()
    finally:
        await pub.stop()
    assert not _acks_threads()  # stop ended the acks thread
    got = await _read(broker.bootstrap, topic, 200)
    assert sorted(r.value for r in got) == sorted(r.value for r in records)
    place = DefaultPartitioner()
    for rec in got:
        assert rec.partition == place(rec.key, list(range(partitions)), list(range(partitions))), rec.key
        assert dict(rec.headers)["n"] == rec.value[1:]


async def test_a_record_too_large_is_refused_alone_and_its_batch_mates_are_published(broker, topics):
    topic = topics["output"]
    await create_topics(broker.bootstrap, [(topic, 1)])
    producer = _producer(broker.bootstrap, producer_max_request_size=100_000)
    pub = Publisher(producer, 100)
    await pub.start()
    try:
        records = [Record(b"small-1", None, [], None), Record(b"x" * 200_000, None, [], None),
                   Record(b"small-2", None, [], None)]
        out = await pub.publish_many(topic, records)
        assert out[0] is None and out[2] is None and isinstance(out[1], RecordTooLarge), out
        assert "200000 bytes" in str(out[1]) and "MessageSizeTooLarge" in str(out[1])
        with pytest.raises(RecordTooLarge):
            await pub.publish(topic, records[1])
    finally:
        await pub.stop()
    assert sorted(r.value for r in await _read(broker.bootstrap, topic, 2)) == [b"small-1", b"small-2"]


async def test_no_broker_is_a_connection_error_and_no_thread_is_left():
    producer = _producer(f"127.0.0.1:{free_port()}")
    with pytest.raises(E.KafkaConnectionError, match="no broker answered"):
        await asyncio.wait_for(_start_quick(producer), 30)
    await producer.stop()
    assert not _acks_threads()


async def _start_quick(producer: RdKafkaProducer) -> None:
    rdkafka_producer.CONNECT_TIMEOUT_S, before = 1.0, rdkafka_producer.CONNECT_TIMEOUT_S
    try:
        await producer.start()
    finally:
        rdkafka_producer.CONNECT_TIMEOUT_S = before


async def test_flush_waits_for_every_ack(broker, topics):
    topic = topics["output"]
    await create_topics(broker.bootstrap, [(topic, 2)])
    producer = _producer(broker.bootstrap)
    await producer.start()
    try:
        futures = [await producer.send(topic, f"v{i}".encode(), key=None) for i in range(300)]
        await producer.flush()
        assert all(f.done() and f.exception() is None for f in futures)
    finally:
        await producer.stop()
    assert len(await _read(broker.bootstrap, topic, 300)) == 300


class _PollFailsOnce:
    """The producer, except that its first poll raises (a callback's or librdkafka's error)."""

    def __init__(self, real) -> None:
        self._real = real
        self.failed = False

    def poll(self, timeout: float) -> int:
        if not self.failed:
            self.failed = True
            raise RuntimeError("poll failed once")
        return self._real.poll(timeout)

    def __getattr__(self, name: str):
        return getattr(self._real, name)


async def test_the_acks_thread_polls_on_after_a_poll_raised(broker, topics):
    topic = topics["output"]
    await create_topics(broker.bootstrap, [(topic, 1)])
    producer = _producer(broker.bootstrap)
    await producer.start()
    flaky = producer._producer = _PollFailsOnce(producer._producer)
    try:
        while not flaky.failed:  # the thread's next poll raises
            await asyncio.sleep(0.01)
        future = await producer.send(topic, b"after", key=None)
        await asyncio.wait_for(future, 20)  # acknowledged: the thread did not end with the error
        assert producer._thread.is_alive()
    finally:
        await producer.stop()
    assert not _acks_threads()
